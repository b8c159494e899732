import tiny


def pytest_terminal_summary(terminalreporter):
    if tiny.MAX_DIFFS:
        terminalreporter.section("largest |optlite - transformers| differences measured (fp32)")
        for name, diff in sorted(tiny.MAX_DIFFS.items()):
            terminalreporter.write_line(f"{name:<40} {diff:.3e}")
