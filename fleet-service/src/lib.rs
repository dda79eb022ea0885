//! Fleet service.
