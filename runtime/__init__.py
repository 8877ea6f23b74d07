"""Networks, loading and sampling: everything between a prompt and decoded frames."""
