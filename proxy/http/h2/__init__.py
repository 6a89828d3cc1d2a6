"""HTTP/2 from clients: the h2 library under one exchange per stream."""
