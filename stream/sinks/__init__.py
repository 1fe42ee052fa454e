"""Disk sinks: crash-safe files of raw and enhanced frames (OME-TIFF unless another sink is
registered and named) plus the run's JSONL index."""

from stream.sinks.base import SINKS, Sink, SinkType, register_sink, sink_for_file, sink_type
from stream.sinks.index import CorruptIndex, IndexWriter, read_index
from stream.sinks.omezarr import OmeZarrSink, recover_ome_zarr
from stream.sinks.recover import Recovered, recover, recover_ome_tiff
from stream.sinks.store import RunWriter, fresh_run_dir
from stream.sinks.tiff import OmeTiffSink, PlaneRecord, SinkError

# The sinks that ship: name, what opens a file, its suffix, what rebuilds one left unclosed.
register_sink("ome-tiff", OmeTiffSink, suffix=".ome.tif", recover=recover_ome_tiff)
register_sink("ome-zarr", OmeZarrSink, suffix=".ome.zarr", recover=recover_ome_zarr)

__all__ = [
    "SINKS",
    "CorruptIndex",
    "IndexWriter",
    "OmeTiffSink",
    "OmeZarrSink",
    "PlaneRecord",
    "Recovered",
    "RunWriter",
    "Sink",
    "SinkError",
    "SinkType",
    "fresh_run_dir",
    "read_index",
    "recover",
    "register_sink",
    "sink_for_file",
    "sink_type",
]
