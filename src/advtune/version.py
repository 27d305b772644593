"""The package version, in a module of its own so that records can name it without importing the
package root."""

VERSION = "0.1.0"
