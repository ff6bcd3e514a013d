"""Benchmarks with reports (``python -m benchmarks`` is ``raftseq bench``). Nothing imports this
package: the product runs it as a child process from the source checkout."""
