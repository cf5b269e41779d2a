"""Coverage-guided fuzz harnesses (atheris), one module per target; see fuzz/README.md."""
