"""Where objects are kept: the archive (blobs on disk) and the index (SQL) with its migrations.
The index never reads blobs; the archive never queries SQL."""
