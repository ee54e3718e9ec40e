"""TotalSegmentator on Ray: CT scans in, multilabel masks and anatomical passports out."""

__version__ = "0.1.0"
