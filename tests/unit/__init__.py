"""One module or pure function at a time; servers only over loopback sockets."""
