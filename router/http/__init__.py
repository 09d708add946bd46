"""The lean HTTP/1.1 layer of the data path: server, upstream client, and their limits."""
