"""The pure core: reading a scan, segmenting it, its passport and its encoded outputs. No Ray, no HTTP, no cloud
(a test over the import graph keeps it so), so each piece is unit-tested directly and reused by every adapter."""
