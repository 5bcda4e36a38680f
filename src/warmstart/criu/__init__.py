"""CRIU: the binary, its options and log, the /dev/shm action script, and keeping workers dumpable."""
