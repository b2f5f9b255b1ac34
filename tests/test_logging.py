"""File/console logger and the metric logger's statistics and progress lines."""
import logging
import re

import pytest
import torch

from util.logger import setup_logger
from util.metric_logger import MetricLogger, SmoothedValue

PROGRESS_LINE = re.compile(r"Epoch: \[3\]\s+\[(?P<i>\s*\d+)/25\]\s+eta: \d+:\d\d:\d\d\s+"
                           r"loss: [\d.]+ \([\d.]+\)\s+lr: [\d.]+ \([\d.]+\)\s+"
                           r"time: [\d.]+\s+data: [\d.]+\s+it/s: [\d.]+\s+max (mem|rss): \d+ MiB")


@pytest.fixture
def logger_name(request):
    name = f"test_{request.node.name}"
    yield name
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def test_rank0_logs_to_console_and_info_txt(tmp_path, capsys, logger_name):
    logger = setup_logger(tmp_path / "run", distributed_rank=0, name=logger_name)
    logger.info("training starts")
    logger.debug("verbose detail")
    logger.warning("careful")
    console = capsys.readouterr().out
    assert "training starts" in console and "careful" in console
    assert "verbose detail" not in console  # console shows INFO and above
    text = (tmp_path / "run" / "info.txt").read_text()
    assert "training starts" in text and "verbose detail" in text and "WARNING: careful" in text
    assert "\x1b[" not in text  # no colour codes in the file


def test_setup_twice_does_not_duplicate_lines(tmp_path, capsys, logger_name):
    setup_logger(tmp_path, name=logger_name)
    logger = setup_logger(tmp_path, name=logger_name)
    logger.info("only once")
    assert capsys.readouterr().out.count("only once") == 1
    assert (tmp_path / "info.txt").read_text().count("only once") == 1


def test_other_ranks_log_warnings_to_console_only(tmp_path, capsys, logger_name):
    logger = setup_logger(tmp_path, distributed_rank=1, name=logger_name)
    logger.info("progress from rank 1")
    logger.warning("problem on rank 1")
    console = capsys.readouterr().out
    assert "progress from rank 1" not in console
    assert "problem on rank 1" in console and f"{logger_name}.rank1" in console
    assert not (tmp_path / "info.txt").exists()


def test_smoothed_value_statistics():
    meter = SmoothedValue(window_size=3)
    meter.update(torch.tensor(1.0))
    meter.update(4.0)
    meter.update(torch.tensor(2.0), n=2)
    meter.update(torch.tensor(8.0))
    # window [4, 2, 8]; all values with weights: 1 + 4 + 2*2 + 8 over a count of 5
    assert meter.value == 8.0 and meter.max == 8.0 and meter.median == 4.0
    assert meter.avg == pytest.approx(14 / 3)
    assert meter.global_avg == pytest.approx(17 / 5) and meter.count == 5
    assert str(meter) == "4.0000 (3.4000)"


def test_logged_tensors_are_snapshots_without_graph():
    metrics = MetricLogger()
    weight = torch.tensor(3.0, requires_grad=True)
    loss = weight * 2
    buffer = torch.tensor(7.0)
    metrics.update(loss=loss, scale=buffer, lr=1e-4, count=torch.tensor(2))
    buffer.add_(100)  # an in-place change after logging must not alter what was logged
    assert metrics.scale.value == 7.0 and metrics.loss.value == 6.0 and metrics.count.value == 2.0
    assert metrics.lr.value == 1e-4
    with pytest.raises(ValueError, match="loss_vector"):
        metrics.update(loss_vector=torch.ones(3))
    with pytest.raises(TypeError, match="name"):
        metrics.update(name="text")


def run_progress(metrics: MetricLogger, logger=None, stop_after=None):
    for step, _ in enumerate(metrics.log_every(range(25), 10, "Epoch: [3]", logger=logger)):
        metrics.update(loss=torch.tensor(float(step)), lr=1e-4)
        if stop_after is not None and step + 1 == stop_after:
            break


def test_log_every_prints_progress_lines(capsys):
    metrics = MetricLogger(delimiter="  ")
    run_progress(metrics)
    lines = capsys.readouterr().out.splitlines()
    progress = [PROGRESS_LINE.search(line) for line in lines[:-1]]
    assert all(progress), lines
    assert [int(m.group("i")) for m in progress] == [0, 10, 20, 24]  # every 10 and the last
    assert re.fullmatch(r"Epoch: \[3\] Total time: \d+:\d\d:\d\d \([\d.]+ s / it, 25 iterations\)", lines[-1])
    assert metrics.loss.global_avg == pytest.approx(12.0)  # mean of 0..24


def test_log_every_through_logger_and_early_stop(tmp_path, capsys, logger_name):
    logger = setup_logger(tmp_path, name=logger_name)
    run_progress(MetricLogger(delimiter="  "), logger=logger, stop_after=12)
    text = (tmp_path / "info.txt").read_text()
    assert len(PROGRESS_LINE.findall(text)) == 2  # steps 0 and 10
    assert re.search(r"Total time: \d+:\d\d:\d\d \([\d.]+ s / it, 12 iterations\)", text)


def test_progress_lines_show_the_chosen_meters_in_their_format(capsys):
    metrics = MetricLogger(delimiter="  ", meter_fmt="{median:.2f}")
    for _ in metrics.log_every(range(3), 10, "Epoch: [0]", meters=("loss", "not_logged", "lr")):
        metrics.update(lr=1e-4, loss=torch.tensor(1.5), loss_ce_unscaled=2.0)
    first = capsys.readouterr().out.splitlines()[0]
    assert re.search(r"eta: \S+  loss: 1.50  lr: 0.00  time:", first), first
    assert metrics.format_averages(["loss", "not_logged", "lr"]) == "loss: 1.5  lr: 0.0001"
    assert str(metrics) == "lr: 0.00  loss: 1.50  loss_ce_unscaled: 2.00"  # every meter, in logging order
