"""Understanding adapters: spectra, truncation, extraction and memory plans."""
