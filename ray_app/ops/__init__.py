"""Operations: AWS resources, cluster lifecycle and cost. Nothing in the scan pipeline imports from here."""
