"""After the dump and before the restore: CRIU's images transformed (zero pages, compression), cached and read ahead."""
