"""Streaming inspection of upload bodies: counting, sniffing, multipart parsing, the stage."""
