//! Ordered writeback (issue 3).
