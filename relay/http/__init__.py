"""The daemon's HTTP listener (``http_listen``): relay.http.server and its route providers."""
