"""iwm.data: data sets, batch sources, views and actions, masks."""
