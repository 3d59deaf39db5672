//! Engine (issue 2).
