"""Calibration runs that write the per-head scores some presses read (HeadKV retrieval-reasoning heads, KVzip
head-level importance)."""
