"""Disk sinks: crash-safe OME-TIFFs of raw and enhanced frames plus the run's JSONL index."""

from stream.sinks.index import CorruptIndex, IndexWriter, read_index
from stream.sinks.recover import Recovered, recover
from stream.sinks.store import RunWriter, fresh_run_dir
from stream.sinks.tiff import OmeTiffSink, PlaneRecord, SinkError

__all__ = [
    "CorruptIndex",
    "IndexWriter",
    "OmeTiffSink",
    "PlaneRecord",
    "Recovered",
    "RunWriter",
    "SinkError",
    "fresh_run_dir",
    "read_index",
    "recover",
]
