"""One module per scenario: matrix, isolation, reload, hostile input, scale."""
