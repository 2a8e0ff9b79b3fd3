"""Reading models (checked) and data, and every write (staged, placed last)."""
