"""Pictures and tables of results for people: overlays of predictions on images."""
