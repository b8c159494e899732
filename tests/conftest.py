import tiny


def pytest_terminal_summary(terminalreporter):
    if tiny.MAX_DIFFS:
        terminalreporter.section("largest differences measured (fp32; vs transformers unless named otherwise)")
        for name, diff in sorted(tiny.MAX_DIFFS.items()):
            terminalreporter.write_line(f"{name:<40} {diff:.3e}")
