"""The benchmark: the gateway against nginx peers, in one run (issue 6). Entry: ``python -m bench.run``."""
