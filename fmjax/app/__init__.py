"""The programs: the command line (`cli`), one module per command (train, evaluate,
predict, demo, bench, info), and how every program starts (`launch`, `allocator`)."""
