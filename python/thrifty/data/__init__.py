"""Data pipeline: sources -> quality filters / dedup / scrubbing -> BPE tokenizer -> packed rows."""
from thrifty.data.packing import IGNORE_INDEX, PackedDataset, pack_documents
from thrifty.data.pipeline import DataBundle, prepare_data
from thrifty.data.preprocess import FilterConfig, exact_dedup, near_dedup, preprocess, quality_reason, scrub
from thrifty.data.sampler import ResumableSampler
from thrifty.data.sources import DataError, Document, default_corpus_files, load_default_corpus, load_documents
from thrifty.data.tokenizer import eos_id, load_tokenizer, save_tokenizer, train_tokenizer, vocab_size

__all__ = ["IGNORE_INDEX", "PackedDataset", "pack_documents", "DataBundle", "prepare_data", "FilterConfig",
           "exact_dedup", "near_dedup", "preprocess", "quality_reason", "scrub", "ResumableSampler", "DataError",
           "Document", "default_corpus_files", "load_default_corpus", "load_documents", "eos_id", "load_tokenizer",
           "save_tokenizer", "train_tokenizer", "vocab_size"]
