"""The modelled client-server link: bandwidth and latency, and the parsers for their values."""

from __future__ import annotations

import re
from typing import Optional, Union

from lightning_parablock.argument_checks import check_float, check_positive

_BYTE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
    "bit": 1 / 8, "kbit": 10**3 / 8, "mbit": 10**6 / 8, "gbit": 10**9 / 8,
}  # fmt: skip


_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


_BANDWIDTH = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zµ]+)\s*(?:/\s*s|ps)\s*$", re.IGNORECASE)


_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zµ]*)\s*$", re.IGNORECASE)


def parse_bandwidth(value: Union[str, float, int], name: Optional[str] = None) -> float:
    """Bytes per second from ``"100MB/s"``, ``"1Gbit/s"``, ``"800Mbps"`` or a number of bytes per second.

    ``name`` is the argument the value was given as (``bandwidth``); an error names it.
    """
    where = f"`{name}`: " if name else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bytes_per_second = float(value)
    else:
        match = _BANDWIDTH.match(str(value))
        raw_unit = match.group(2) if match else ""
        unit = raw_unit.lower()
        if raw_unit.endswith("b") and unit[:-1] + "bit" in _BYTE_UNITS:
            unit = unit[:-1] + "bit"  # "800Mbps", "800Mb/s": a lower-case b means bits, an upper-case B bytes
        if not match or unit not in _BYTE_UNITS:
            raise ValueError(
                f"{where}Could not parse bandwidth {value!r}. Use a positive number with a unit per second, e.g."
                " '100MB/s', '1.5GiB/s', '800Mbit/s', '800Mbps', or a number of bytes per second."
            )
        bytes_per_second = float(match.group(1)) * _BYTE_UNITS[unit]
    if not bytes_per_second > 0:
        raise ValueError(f"{f'`{name}`' if name else 'Bandwidth'} must be positive, got {value!r}.")
    return bytes_per_second


def parse_duration(value: Union[str, float, int], name: Optional[str] = None) -> float:
    """Seconds from ``"20ms"``, ``"0.5s"``, ``"150us"`` or a number of seconds.

    ``name`` is the argument the value was given as (``latency``, ``comm_timeout``); an error names it.
    """
    where = f"`{name}`: " if name else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        unit = (match.group(2) or "s").lower() if match else ""
        if not match or unit not in _TIME_UNITS:
            raise ValueError(
                f"{where}Could not parse duration {value!r}. Use a number with a unit (s, ms, us), e.g. '20ms',"
                " '1.5s', '150us', or a number of seconds."
            )
        seconds = float(match.group(1)) * _TIME_UNITS[unit]
    if seconds < 0:
        raise ValueError(f"{f'`{name}`' if name else 'A duration'} cannot be negative, got {value!r}.")
    return seconds


class SimulatedLink:
    """A client-server link of fixed bandwidth and latency, each client with its own link.

    Args:
        bandwidth: bytes per second each way, e.g. ``"100MB/s"`` (the paper studies 50, 100 and
            150 MB/s). ``None`` models an infinitely fast link: only the real work is timed.
        latency: one-way latency added to every transfer, e.g. ``"20ms"``.
    """

    def __init__(self, bandwidth: Optional[Union[float, str]] = None, latency: Union[float, str] = 0.0) -> None:
        # float before str: a number on the command line ("--...bandwidth 1e8") parses as bytes per second
        self.bandwidth = bandwidth
        self.latency = latency
        self.bytes_per_second = (
            None if bandwidth is None else check_positive("bandwidth", parse_bandwidth(bandwidth, "bandwidth"))
        )
        self.latency_s = check_float("latency", parse_duration(latency, "latency"), minimum=0.0)

    def transfer_seconds(self, nbytes: int) -> float:
        """Modelled time to move ``nbytes`` one way."""
        if self.bytes_per_second is None:
            return self.latency_s
        return self.latency_s + nbytes / self.bytes_per_second

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bandwidth={self.bandwidth!r}, latency={self.latency!r})"

    def __eq__(self, other: object) -> bool:
        """The same bandwidth and latency, however they were written."""
        if type(other) is not type(self):
            return False
        return (other.bytes_per_second, other.latency_s) == (self.bytes_per_second, self.latency_s)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.bytes_per_second, self.latency_s))
