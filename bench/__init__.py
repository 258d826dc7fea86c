"""The benchmark: the gateway against nginx peers, in one run (issue 6).

Entry point: ``python -m bench.run`` (``make bench``).
"""
