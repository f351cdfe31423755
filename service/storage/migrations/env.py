"""Alembic environment: migrations run on the connection `storage.schema.migrate` passes.

Run from the node at start-up (never by hand), so the schema always matches the code.
For a new revision: `alembic -x url=sqlite:///tmp.db revision --autogenerate -m "..."` from
a checkout, with `script_location` pointing here.
"""

from alembic import context
from sqlalchemy import create_engine

from compacs.service.storage.schema import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")

if connection is None:  # command-line use, for writing new revisions
    url = context.get_x_argument(as_dictionary=True).get("url", "sqlite://")
    connection = create_engine(url).connect()

context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
