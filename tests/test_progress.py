"""Progress bars: a plain line at most every interval and a final total/total line in a log; a tqdm bar on a
terminal."""

import io

from pipeline.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_the_bar_is_lines_ending_with_the_total():
    log = io.StringIO()
    bar = progress(total=200, desc="train st seed 0", unit="step", file=log, leave=False, mininterval=0.5)
    for i in range(200):
        bar.set_postfix(loss=f"{i:.1f}", refresh=False)
        bar.update(1)
    bar.close()
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n") and all(line.strip() for line in lines)
    # the caller's leave=False and mininterval are for a terminal; the log keeps the start and the final count only
    assert len(lines) == 2 and lines[0].startswith("train st seed 0:   0%")
    assert "200/200" in lines[-1] and "loss=199.0" in lines[-1]


def test_an_iterable_in_a_log_ends_with_its_length():
    log = io.StringIO()
    assert list(progress(range(7), desc="decode", unit="frame", file=log)) == list(range(7))
    assert "\r" not in log.getvalue() and "7/7" in log.getvalue().splitlines()[-1]


def test_on_a_terminal_it_is_a_redrawn_tqdm_bar():
    screen = Terminal()
    for _ in progress(range(5), desc="x", file=screen, mininterval=0):
        pass
    assert screen.getvalue().count("\r") >= 5 and "5/5" in screen.getvalue()


def test_disabled_writes_nothing():
    log = io.StringIO()
    list(progress(range(3), file=log, disable=True))
    assert log.getvalue() == ""


def test_in_a_log_a_line_comes_at_most_every_interval():
    log = io.StringIO()
    clock = [0.0]
    bar = progress(total=100, desc="t", file=log, interval=30)
    bar._time = lambda: clock[0]  # tqdm's clock: one update per simulated second
    bar.start_t = bar.last_print_t = 0.0
    for _ in range(100):
        clock[0] += 1.0
        bar.update(1)
    bar.close()
    counts = [int(line.split("|")[2].split("/")[0]) for line in log.getvalue().splitlines()]
    assert counts == [0, 30, 60, 90, 100]
