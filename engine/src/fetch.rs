//! Model fetch (being written).
