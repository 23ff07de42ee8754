"""Golden vectors: a versioned state that another implementation checks itself against."""
