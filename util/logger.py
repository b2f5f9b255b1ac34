"""The run's logger: console (coloured on a terminal) and ``<output_dir>/info.txt`` on the main process."""
import logging
import sys
from pathlib import Path
from typing import Optional, Union

from termcolor import colored

_HANDLER_MARK = "_dn_detr_handler"
_DATE_FORMAT = "%m/%d %H:%M:%S"
PLAIN_FORMAT = "[%(asctime)s] %(name)s %(levelname)s: %(message)s"


class ColorfulFormatter(logging.Formatter):
    """Green ``[time name]:`` prefix; warnings and errors flagged in red."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = super().formatMessage(record)
        if record.levelno >= logging.ERROR:
            return colored(record.levelname, "red", attrs=["bold", "underline"]) + " " + message
        if record.levelno >= logging.WARNING:
            return colored(record.levelname, "red", attrs=["bold"]) + " " + message
        return message


def setup_logger(output_dir: Optional[Union[str, Path]] = None, distributed_rank: int = 0, color: bool = True,
                 name: str = "dn_detr") -> logging.Logger:
    """Configure and return the logger ``name``.

    Rank 0 logs INFO and above to stdout and DEBUG and above to ``output_dir/info.txt`` (appended; no
    file when ``output_dir`` is None). Other ranks log only warnings and errors, to stdout, tagged with
    their rank. Colours are used when ``color`` is set and stdout is a terminal. Calling it again
    replaces the handlers it installed before (no duplicated lines), e.g. to switch ``output_dir``.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
        handler.close()

    shown_name = name if distributed_rank == 0 else f"{name}.rank{distributed_rank}"
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if distributed_rank == 0 else logging.WARNING)
    if color and sys.stdout.isatty():
        prefix = colored("[%(asctime)s " + shown_name + "]: ", "green")
        console.setFormatter(ColorfulFormatter(prefix + "%(message)s", datefmt=_DATE_FORMAT))
    else:
        console.setFormatter(logging.Formatter(PLAIN_FORMAT.replace("%(name)s", shown_name), datefmt=_DATE_FORMAT))
    _add(logger, console)

    if output_dir is not None and distributed_rank == 0:
        log_file = Path(output_dir) / "info.txt"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(logging.Formatter(PLAIN_FORMAT, datefmt=_DATE_FORMAT))
        _add(logger, file_handler)
    return logger


def _add(logger: logging.Logger, handler: logging.Handler) -> None:
    setattr(handler, _HANDLER_MARK, True)
    logger.addHandler(handler)
