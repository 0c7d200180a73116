"""City table, raw-file loaders, remote fetching, preparation and the dataset bundle."""

from graphtune.data.bundle import DatasetBundle, Scaler
from graphtune.data.cities import CitySpec, get_city, list_cities
from graphtune.data.prepare import prepare_dataset, write_processed
from graphtune.data.synthetic import synthetic_bundle

__all__ = ["CitySpec", "DatasetBundle", "Scaler", "get_city", "list_cities", "prepare_dataset", "synthetic_bundle",
           "write_processed"]
