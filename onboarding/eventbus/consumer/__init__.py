"""The receiving side: one durable pull consumer per context, each event applied once.

One module per part of a consumer's life; ``runner`` tells the story and names the others.
Never imports the sending side.
"""
