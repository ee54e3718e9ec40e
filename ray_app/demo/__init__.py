"""The demo and its fixtures: synthetic CT phantoms, the weights made for them (``phantom_weights/``, in
TotalSegmentator's layout) and the inputs of ``ray-app demo``. Never needed to segment real scans."""
