"""What applications use to talk to a raftseq cluster. Imports ``sequencer.protocol`` only."""
