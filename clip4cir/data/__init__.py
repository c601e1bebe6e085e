"""Layer 1, the data: what a data set is (sources), reading its images and captions, the torch datasets over it,
and synthetic data sets in the real layouts."""
