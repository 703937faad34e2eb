"""An existing FastAPI service with SQLAlchemy ORM models and Alembic migrations, that
adds offline sync for its field technicians by mounting syncunit's app at ``/sync``."""
