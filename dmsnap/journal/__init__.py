"""The ordered journal (cache): FIFO of writes and markers, flusher, recovery."""
