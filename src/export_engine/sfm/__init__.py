"""Collection jobs: match an image collection with a MASt3R artifact into COLMAP's database and hloc's files.

collection.py   the images (names, sizes after EXIF orientation, EXIF focal lengths)
pairs.py        pair strategies (complete, swin, logwin, retrieval, a pairs file)
schedule.py     pairs in batches and the token-slot plan (each image encoded once while it fits)
executor.py     the pipelined matcher (reader pool, encoder, decoder, FastNN-Lite thread, writer thread)
database.py     COLMAP's database, written with sqlite3 (resumable)
hloc.py         pairs.txt, features.h5, matches.h5
colmap.py       COLMAP's verification and mapper through pycolmap
run.py          ``match_many``: checks, then the run, then the files (the CLI's ``match-many``)
"""
