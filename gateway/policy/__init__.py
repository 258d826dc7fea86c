"""Upload policy: which requests are uploads, who uploads, and what each channel allows."""
