"""The Raft adapter: the only package that names pysyncobj or its private names."""
