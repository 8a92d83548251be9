"""A real SQLAlchemy model for the integration tests (two mapped classes and a
relationship) and the engines the tests give the coordinators."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import ForeignKey, String, create_engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

if TYPE_CHECKING:
    from tests.integration.conftest import Env

__all__ = ["Base", "Customer", "Order", "make_engine", "url"]


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(100), unique=True)
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id"))
    total: Mapped[int]
    customer: Mapped[Customer] = relationship(back_populates="orders")


def url(env: Env, driver: str = "psycopg") -> sa.URL:
    """The test database's URL for SQLAlchemy."""
    params = psycopg.conninfo.conninfo_to_dict(env.dsn)
    return sa.URL.create(
        f"postgresql+{driver}", username=str(params.get("user") or "") or None,
        password=str(params["password"]) if params.get("password") else None,
        host=str(params.get("host") or "") or None,
        port=int(str(params["port"])) if params.get("port") else None,
        database=str(params["dbname"]))


def make_engine(env: Env) -> Any:
    """The tables made, and an engine of the test's driver kind (``Engine`` or
    ``AsyncEngine``) on the test's database."""
    ddl = create_engine(url(env))
    Base.metadata.create_all(ddl)
    ddl.dispose()
    if env.driver == "sync":
        return create_engine(url(env), pool_size=4)
    return create_async_engine(url(env), pool_size=4)
