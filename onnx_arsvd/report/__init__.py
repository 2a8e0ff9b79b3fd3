"""Results as tables, JSON, Markdown and plots. Runs nothing."""
