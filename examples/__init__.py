"""Examples of applications built on raftseq (run them from the repository root)."""
