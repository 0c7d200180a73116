"""Raw-file readers: every format from the real METR-LA/PEMS-BAY sample, tiny hand-checked data, bad input."""

from __future__ import annotations

import math
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from graphtune.data.loaders import (
    SeriesData,
    align,
    coordinates_to_adjacency,
    distances_to_adjacency,
    haversine_km,
    read_graph,
    read_locations,
    read_series,
)
from graphtune.data.graph import component_labels, graph_stats, spectral_coordinates
from graphtune.errors import ConfigError, DataError

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
WEEK_H5 = SAMPLE / "metr-la-week" / "metr-la-week.h5"
LA_PKL = SAMPLE / "metr-la-week" / "adj_mx.pkl"
LA_LOCATIONS = SAMPLE / "metr-la-week" / "graph_sensor_locations.csv"
BAY_PKL = SAMPLE / "pems-bay-graph" / "adj_mx_bay.pkl"
BAY_DISTANCES = SAMPLE / "pems-bay-graph" / "distances_bay_2017.csv"
BAY_LOCATIONS = SAMPLE / "pems-bay-graph" / "graph_sensor_locations_bay.csv"
MONTEVIDEO = SAMPLE / "montevideo-bus"


def assert_data_error(call, path, pattern: str) -> str:
    """The call raises a one-line DataError that names `path` and matches `pattern`."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert str(path) in message, message
    assert re.search(pattern, message), message
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def week() -> pd.DataFrame:
    return pd.read_hdf(WEEK_H5, "df")


def raw_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def tiny_frame(freq: str, periods: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    values = np.round(rng.uniform(20, 70, (periods, 3)), 3)
    index = pd.date_range("2021-05-03 00:00", periods=periods, freq=freq)
    return pd.DataFrame(values, index=index, columns=["s1", "s2", "s3"])


# ----------------------------------------------------------------------------- series: real sample
def test_h5_reads_the_real_week(week):
    data = read_series(WEEK_H5)
    assert isinstance(data, SeriesData)
    assert data.values.shape == (2016, 207)
    assert data.values.dtype == np.float64
    assert data.interval_minutes == 5.0
    assert data.index[0] == pd.Timestamp("2012-03-01 00:00")
    assert data.index[-1] == pd.Timestamp("2012-03-07 23:55")
    assert data.sensor_ids[:3] == ["773869", "767541", "767542"]
    assert data.sensor_ids == raw_pickle(LA_PKL)[0]  # same order as the DCRNN graph
    np.testing.assert_array_equal(data.values, week.to_numpy())
    assert data.path == WEEK_H5


def test_csv_with_timestamp_index_round_trips_exactly(week, tmp_path):
    path = tmp_path / "week.csv"
    week.to_csv(path)  # first column: the timestamps, with an empty header cell
    data = read_series(path)
    np.testing.assert_array_equal(data.values, week.to_numpy())
    assert data.sensor_ids == list(week.columns)
    assert data.interval_minutes == 5.0
    assert data.index.equals(week.index)


def test_csv_named_timestamp_column_in_any_position(week, tmp_path):
    frame = week.iloc[:50, :4].copy()
    frame.insert(2, "when", frame.index.strftime("%Y-%m-%d %H:%M"))
    path = tmp_path / "named.csv"
    frame.to_csv(path, index=False)
    data = read_series(path, timestamp_column="when")
    assert data.sensor_ids == list(week.columns[:4])
    np.testing.assert_array_equal(data.values, week.iloc[:50, :4].to_numpy())
    assert data.index[0] == pd.Timestamp("2012-03-01") and data.interval_minutes == 5.0


def test_csv_without_timestamps_needs_start_and_interval(week, tmp_path):
    path = tmp_path / "plain.csv"
    week.iloc[:10].to_csv(path, index=False)
    assert_data_error(lambda: read_series(path), path, "no timestamps; give start and interval_minutes")
    data = read_series(path, start="2012-03-01", interval_minutes=5)
    np.testing.assert_array_equal(data.values, week.iloc[:10].to_numpy())
    assert data.index.equals(week.index[:10])


def test_npy_and_npz_round_trip_the_week(week, tmp_path):
    values = week.to_numpy()
    np.save(tmp_path / "week.npy", values)
    from_npy = read_series(tmp_path / "week.npy", start="2012-03-01", interval_minutes=5)
    np.testing.assert_array_equal(from_npy.values, values)
    assert from_npy.sensor_ids[:3] == ["0", "1", "2"] and from_npy.sensor_ids[-1] == "206"
    assert from_npy.index.equals(week.index)

    np.savez(tmp_path / "week.npz", data=values, sensor_ids=np.array(week.columns, dtype=str),
             timestamps=week.index.to_numpy())
    from_npz = read_series(tmp_path / "week.npz")
    np.testing.assert_array_equal(from_npz.values, values)
    assert from_npz.sensor_ids == list(week.columns)
    assert from_npz.index.equals(week.index) and from_npz.interval_minutes == 5.0


def test_three_channel_arrays_keep_the_chosen_channel(week, tmp_path):
    values = week.to_numpy()[:20]
    stacked = np.stack([values, values + 1000, values * 0], axis=-1)  # (T, N, 3)
    np.save(tmp_path / "c.npy", stacked)
    np.testing.assert_array_equal(read_series(tmp_path / "c.npy", start="2012-03-01", interval_minutes=5).values,
                                  values)
    second = read_series(tmp_path / "c.npy", start="2012-03-01", interval_minutes=5, channel=1)
    np.testing.assert_array_equal(second.values, values + 1000)
    assert_data_error(lambda: read_series(tmp_path / "c.npy", start="2012-03-01", interval_minutes=5, channel=3),
                      tmp_path / "c.npy", "channel 3 requested but the array has 3 channels")


def test_npz_array_choice(tmp_path):
    a = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.savez(tmp_path / "x.npz", x=a)
    np.testing.assert_array_equal(read_series(tmp_path / "x.npz", start="2020-01-01", interval_minutes=5).values, a)
    np.savez(tmp_path / "only.npz", speeds=a, sensor_ids=np.array([7, 8, 9]))
    only = read_series(tmp_path / "only.npz", start="2020-01-01", interval_minutes=5)
    assert only.sensor_ids == ["7", "8", "9"]
    np.savez(tmp_path / "two.npz", speeds=a, flows=a * 2)
    assert_data_error(lambda: read_series(tmp_path / "two.npz", start="2020-01-01", interval_minutes=5),
                      tmp_path / "two.npz", "cannot tell which array")
    flows = read_series(tmp_path / "two.npz", key="flows", start="2020-01-01", interval_minutes=5)
    np.testing.assert_array_equal(flows.values, a * 2)
    assert_data_error(lambda: read_series(tmp_path / "two.npz", key="nope", start="2020-01-01", interval_minutes=5),
                      tmp_path / "two.npz", "no array 'nope'")


def test_h5_key_choice(tmp_path):
    frame = tiny_frame("5min")
    one = tmp_path / "one.h5"
    frame.to_hdf(one, key="speed")
    assert read_series(one).sensor_ids == ["s1", "s2", "s3"]  # the only key
    two = tmp_path / "two.h5"
    frame.to_hdf(two, key="speed")
    (frame * 2).to_hdf(two, key="flow")
    assert_data_error(lambda: read_series(two), two, "holds 2 tables .*give the key")
    np.testing.assert_array_equal(read_series(two, key="flow").values, frame.to_numpy() * 2)
    assert_data_error(lambda: read_series(two, key="df"), two, "no key 'df'")


# ----------------------------------------------------------------------------- series: time grid
def test_fifteen_minute_csv(tmp_path):
    frame = tiny_frame("15min")
    frame.to_csv(tmp_path / "q.csv")
    data = read_series(tmp_path / "q.csv")
    assert data.interval_minutes == 15.0
    assert data.index[1] == pd.Timestamp("2021-05-03 00:15")
    np.testing.assert_array_equal(data.values, frame.to_numpy())


def test_hourly_npz_and_matching_interval(tmp_path):
    frame = tiny_frame("h")
    stamps = np.array(frame.index.strftime("%Y-%m-%d %H:%M"), dtype=str)  # (T,) fixed-width strings
    np.savez(tmp_path / "h.npz", data=frame.to_numpy(), timestamps=stamps)
    assert read_series(tmp_path / "h.npz").interval_minutes == 60.0
    assert read_series(tmp_path / "h.npz", interval_minutes=60).interval_minutes == 60.0
    assert_data_error(lambda: read_series(tmp_path / "h.npz", interval_minutes=5), tmp_path / "h.npz",
                      "60 minutes apart but interval_minutes=5")
    assert_data_error(lambda: read_series(tmp_path / "h.npz", start="2021-05-04"), tmp_path / "h.npz",
                      "first timestamp is 2021-05-03 00:00:00")


def test_skipped_steps_are_an_error_unless_filled_with_nan(tmp_path):
    frame = tiny_frame("5min", periods=10).drop(index=pd.date_range("2021-05-03 00:15", periods=3, freq="5min"))
    frame.to_csv(tmp_path / "gap.csv")
    assert_data_error(lambda: read_series(tmp_path / "gap.csv"), tmp_path / "gap.csv",
                      r"timestamps skip 3 steps of the 5-minute interval in 1 gap\(s\), the first after "
                      r"2021-05-03 00:10:00; pass fill_gaps=True")
    with pytest.warns(UserWarning, match=r"skip 3 steps .*; inserted as missing \(NaN\) readings"):
        data = read_series(tmp_path / "gap.csv", fill_gaps=True)
    assert data.values.shape == (10, 3) and data.interval_minutes == 5.0
    assert np.isnan(data.values[3:6]).all()
    np.testing.assert_array_equal(data.values[[0, 1, 2, 6, 7, 8, 9]], frame.to_numpy())
    assert data.index.equals(pd.date_range("2021-05-03", periods=10, freq="5min"))


def test_irregular_and_unordered_timestamps_are_errors(tmp_path):
    frame = tiny_frame("5min")
    shifted = frame.copy()
    shifted.index = shifted.index.insert(4, pd.Timestamp("2021-05-03 00:17")).delete(5)
    shifted.sort_index().to_csv(tmp_path / "irregular.csv")
    assert_data_error(lambda: read_series(tmp_path / "irregular.csv"), tmp_path / "irregular.csv",
                      r"cannot infer the sampling interval of .*irregular \(e\.g\. 2021-05-03 00:15:00 -> "
                      r"2021-05-03 00:17:00")
    frame.iloc[[0, 2, 1, 3]].to_csv(tmp_path / "unordered.csv")
    assert_data_error(lambda: read_series(tmp_path / "unordered.csv"), tmp_path / "unordered.csv",
                      "not strictly increasing")
    frame.iloc[[0, 1, 1, 2]].to_csv(tmp_path / "repeated.csv")
    assert_data_error(lambda: read_series(tmp_path / "repeated.csv"), tmp_path / "repeated.csv",
                      "not strictly increasing")


def test_one_row_needs_an_interval(tmp_path):
    tiny_frame("5min", periods=1).to_csv(tmp_path / "one.csv")
    assert_data_error(lambda: read_series(tmp_path / "one.csv"), tmp_path / "one.csv", "one time step")
    assert read_series(tmp_path / "one.csv", interval_minutes=5).interval_minutes == 5.0


def test_bad_interval_option(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((3, 2)))
    with pytest.raises(ConfigError, match="interval_minutes"):
        read_series(tmp_path / "a.npy", start="2020-01-01", interval_minutes=0)


# ----------------------------------------------------------------------------- series: bad input
def test_missing_unknown_and_corrupt_series_files(tmp_path):
    missing = tmp_path / "nope.h5"
    assert_data_error(lambda: read_series(missing), missing, "no such file")
    other = tmp_path / "speeds.parquet"
    other.write_bytes(b"x")
    assert_data_error(lambda: read_series(other), other, "unknown series format")
    assert_data_error(lambda: read_series(other, fmt="xls"), other, "unknown series format 'xls'")
    for name in ("broken.h5", "broken.npy", "broken.npz"):
        path = tmp_path / name
        path.write_bytes(b"this is not a data file" * 10)
        assert_data_error(lambda: read_series(path, start="2020-01-01", interval_minutes=5), path, "cannot read")


def test_non_numeric_inf_nan_and_empty_values(tmp_path):
    header = "time,a,b\n"
    (tmp_path / "text.csv").write_text(header + "2020-01-01 00:00,1.0,2.0\n2020-01-01 00:05,fast,3.0\n")
    assert_data_error(lambda: read_series(tmp_path / "text.csv"), tmp_path / "text.csv",
                      "column 'a' holds non-numeric values \\(e.g. 'fast'\\)")
    (tmp_path / "inf.csv").write_text(header + "2020-01-01 00:00,1.0,2.0\n2020-01-01 00:05,3.0,inf\n")
    assert_data_error(lambda: read_series(tmp_path / "inf.csv"), tmp_path / "inf.csv",
                      "infinite value at row 1, column 1")
    (tmp_path / "nan.csv").write_text(header + "2020-01-01 00:00,1.0,\n2020-01-01 00:05,0.0,NaN\n")
    data = read_series(tmp_path / "nan.csv")  # NaN and 0 are missing readings, kept as read
    np.testing.assert_array_equal(data.values, [[1.0, np.nan], [0.0, np.nan]])
    (tmp_path / "empty.csv").write_text(header)
    assert_data_error(lambda: read_series(tmp_path / "empty.csv", start="2020-01-01", interval_minutes=5),
                      tmp_path / "empty.csv", "empty")
    (tmp_path / "blank.csv").write_text("")
    assert_data_error(lambda: read_series(tmp_path / "blank.csv"), tmp_path / "blank.csv", "empty")
    np.save(tmp_path / "inf.npy", np.array([[1.0, -np.inf]]))
    assert_data_error(lambda: read_series(tmp_path / "inf.npy", start="2020-01-01", interval_minutes=5),
                      tmp_path / "inf.npy", "infinite value")
    np.save(tmp_path / "text.npy", np.array([["a", "b"]]))
    assert_data_error(lambda: read_series(tmp_path / "text.npy", start="2020-01-01", interval_minutes=5),
                      tmp_path / "text.npy", "expected numbers")
    np.save(tmp_path / "none.npy", np.zeros((0, 4)))
    assert_data_error(lambda: read_series(tmp_path / "none.npy", start="2020-01-01", interval_minutes=5),
                      tmp_path / "none.npy", r"empty \(shape \(0, 4\)\)")


def test_duplicated_ids_and_wrong_dimensions(tmp_path):
    (tmp_path / "dup.csv").write_text("time,a,b,a\n2020-01-01 00:00,1,2,3\n2020-01-01 00:05,1,2,3\n")
    assert_data_error(lambda: read_series(tmp_path / "dup.csv"), tmp_path / "dup.csv", r"duplicated sensor ids \(a\)")
    np.savez(tmp_path / "dup.npz", data=np.ones((2, 2)), sensor_ids=np.array(["7", "7"]))
    assert_data_error(lambda: read_series(tmp_path / "dup.npz", start="2020-01-01", interval_minutes=5),
                      tmp_path / "dup.npz", "duplicated sensor ids")
    np.savez(tmp_path / "short.npz", data=np.ones((2, 3)), sensor_ids=np.array(["7", "8"]))
    assert_data_error(lambda: read_series(tmp_path / "short.npz", start="2020-01-01", interval_minutes=5),
                      tmp_path / "short.npz", "2 sensor ids for 3 columns")
    for shape in [(5,), (2, 3, 4, 5)]:
        path = tmp_path / f"dims{len(shape)}.npy"
        np.save(path, np.ones(shape))
        assert_data_error(lambda: read_series(path, start="2020-01-01", interval_minutes=5), path,
                          f"got {len(shape)} dimensions")


# ----------------------------------------------------------------------------- graphs
def test_real_metr_la_pickle():
    ids, _, adj = raw_pickle(LA_PKL)
    got, got_ids = read_graph(LA_PKL)
    assert got.dtype == np.float32 and got.shape == (207, 207)
    assert got_ids == ids
    np.testing.assert_array_equal(got, adj)
    assert int((got > 0).sum()) == 1722


def test_bay_distances_reproduce_the_published_adjacency_exactly():
    ids, _, published = raw_pickle(BAY_PKL)
    adj, got_ids = read_graph(BAY_DISTANCES, sensor_ids=ids)
    assert got_ids == ids
    np.testing.assert_array_equal(adj, published)  # bit for bit, all 325 x 325 entries
    assert int((adj > 0).sum()) == 2694


def test_bay_distances_without_ids_align_to_the_published_order():
    ids, _, published = raw_pickle(BAY_PKL)
    adj, got_ids = read_graph(BAY_DISTANCES)  # ids in order of first appearance in the file
    assert sorted(got_ids) == sorted(ids) and got_ids[:3] == ["400001", "400017", "400030"]
    assert got_ids != ids
    series = SeriesData(np.zeros((2, 325)), pd.date_range("2017-01-01", periods=2, freq="5min"), list(ids), 5.0,
                        Path("bay.h5"))
    ordered, coords = align(series, adj, got_ids, None, files={})
    np.testing.assert_array_equal(ordered, published)
    assert coords is None


def test_gaussian_kernel_on_three_nodes_by_hand(tmp_path):
    # Finite distances {a->a 0, a->b 1, b->c 2}: std = sqrt(2/3), so w = exp(-d^2 * 3/2).
    (tmp_path / "d.csv").write_text("from,to,cost\na,a,0\na,b,1\nb,c,2\nx,a,5\n")
    adj, ids = read_graph(tmp_path / "d.csv", sensor_ids=["a", "b", "c"])
    assert ids == ["a", "b", "c"]
    expected = np.array([[1, math.exp(-1.5), 0], [0, 0, 0], [0, 0, 0]], dtype=np.float32)  # exp(-6) < 0.1
    np.testing.assert_allclose(adj, expected, rtol=1e-6, atol=0)
    all_weights, _ = read_graph(tmp_path / "d.csv", sensor_ids=["a", "b", "c"], normalized_k=0)
    assert all_weights[1, 2] == pytest.approx(math.exp(-6), rel=1e-6)
    assert all_weights[1, 0] == 0  # directed: no b->a distance
    (tmp_path / "plain.csv").write_text("a,a,0\na,b,1\nb,c,2\n")  # no header, ids from the file
    plain, plain_ids = read_graph(tmp_path / "plain.csv", fmt="edges")
    assert plain_ids == ["a", "b", "c"]
    np.testing.assert_allclose(plain, expected, rtol=1e-6, atol=0)


def test_edges_warn_about_sensors_without_any_distance(tmp_path):
    (tmp_path / "d.csv").write_text("from,to,cost\na,a,0\na,b,1\nb,c,2\n")
    with pytest.warns(UserWarning, match="1 of 4 sensors have no distance at all \\(z\\)"):
        adj, _ = read_graph(tmp_path / "d.csv", sensor_ids=["a", "b", "c", "z"])
    assert not adj[3].any() and not adj[:, 3].any()


def test_links_are_a_zero_one_graph_whatever_their_cost(tmp_path):
    # The same rows as distances would drop the long link c -> d (exp(-(9 / std)^2) < 0.1); as links it stays.
    (tmp_path / "l.csv").write_text("from,to,cost\na,b,1\nb,c,1\nc,d,9\nx,a,2\n")
    as_links, ids = read_graph(tmp_path / "l.csv", fmt="links", sensor_ids=["a", "b", "c", "d"])
    assert ids == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(as_links, [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])  # directed
    assert as_links.dtype == np.float32
    as_distances, _ = read_graph(tmp_path / "l.csv", sensor_ids=["a", "b", "c", "d"])  # from,to,cost -> edges
    assert as_distances[2, 3] == 0 and as_distances[0, 1] > 0.1
    (tmp_path / "two.csv").write_text("a,b\nb,c\n")  # two columns, no header, ids from the file
    two, two_ids = read_graph(tmp_path / "two.csv", fmt="links")
    assert two_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(two, [[0, 1, 0], [0, 0, 1], [0, 0, 0]])
    (tmp_path / "head.csv").write_text("from,to\na,b\n")
    np.testing.assert_array_equal(read_graph(tmp_path / "head.csv", fmt="links")[0], [[0, 1], [0, 0]])
    with pytest.warns(UserWarning, match="1 of 3 sensors have no link at all \\(z\\)"):
        read_graph(tmp_path / "head.csv", fmt="links", sensor_ids=["a", "b", "z"])
    (tmp_path / "one.csv").write_text("a\nb\n")
    assert_data_error(lambda: read_graph(tmp_path / "one.csv", fmt="links"), tmp_path / "one.csv",
                      "expected 2 or 3 columns from,to\\[,cost\\], got 1")


def test_the_real_montevideo_links_keep_all_690_as_links_and_321_under_the_kernel():
    """Why montevideo-bus registers graph_format: links: DCRNN's kernel over its link lengths keeps 321 of 690."""
    ids = read_series(MONTEVIDEO / "bus_inflow.csv").sensor_ids
    links, _ = read_graph(MONTEVIDEO / "links.csv", fmt="links", sensor_ids=ids)
    kernel, _ = read_graph(MONTEVIDEO / "links.csv", sensor_ids=ids)
    assert graph_stats(links) == {"edges": 690, "isolated": 0, "components": 1}
    assert graph_stats(kernel) == {"edges": 321, "isolated": 216, "components": 354}


# ----------------------------------------------------------------------------- graph facts and spectral positions
def test_graph_stats_by_hand():
    adj = np.zeros((6, 6), dtype=np.float32)
    np.fill_diagonal(adj, 1.0)  # self-loops (DCRNN pickles have them) are not edges
    adj[0, 1] = adj[1, 0] = 0.5  # a symmetric pair counts twice
    adj[2, 3] = 0.2  # one direction only: 2 and 3 are weakly connected
    # nodes 4 and 5: no edge at all
    assert graph_stats(adj) == {"edges": 3, "isolated": 2, "components": 4}
    np.testing.assert_array_equal(component_labels(adj), [0, 0, 1, 1, 2, 3])
    chain = np.zeros((5, 5))
    chain[4, 3] = chain[3, 2] = chain[1, 2] = chain[1, 0] = 1.0  # directions mixed: one weak component
    assert graph_stats(chain) == {"edges": 4, "isolated": 0, "components": 1}
    assert graph_stats(np.zeros((0, 0))) == {"edges": 0, "isolated": 0, "components": 0}


def test_graph_stats_of_the_real_metr_la_graph():
    adj, _ = read_graph(LA_PKL)
    assert graph_stats(adj) == {"edges": 1515, "isolated": 1, "components": 2}  # 1722 weights - 207 self-loops


def test_spectral_coordinates_of_a_path_are_cosines_along_it():
    # Path 0-1-2-3-4-5, one direction listed: the random-walk Laplacian's eigenvectors are cos(pi k i / 5).
    adj = np.zeros((6, 6))
    adj[np.arange(5), np.arange(1, 6)] = 1.0
    coords = spectral_coordinates(adj)
    i = np.arange(6)
    np.testing.assert_allclose(coords[:, 0], np.cos(np.pi * i / 5), atol=1e-12)  # monotone along the path
    np.testing.assert_allclose(coords[:, 1], np.cos(2 * np.pi * i / 5), atol=1e-12)
    assert np.all(np.diff(coords[:, 0]) < 0)
    np.testing.assert_allclose(spectral_coordinates(adj[::-1, ::-1]), coords, atol=1e-12)  # sign: first entry > 0
    np.testing.assert_allclose(spectral_coordinates(3 * adj + 3 * adj.T), coords, atol=1e-12)  # scale, direction


def test_spectral_coordinates_place_components_apart():
    # Component {0, 1, 2} (a path), the pair {3, 4}, and the lone node 5.
    adj = np.zeros((6, 6))
    adj[0, 1] = adj[1, 2] = adj[3, 4] = 1.0
    coords = spectral_coordinates(adj)
    # The path: cos(pi i / 2) and cos(pi i), in a box of half-width 1 around 0.
    np.testing.assert_allclose(coords[:3], [[1, 1], [0, -1], [-1, 1]], atol=1e-12)
    # The pair: half-width sqrt(2/3), centred after the gap 0.5; a pair has one coordinate only.
    r2 = math.sqrt(2 / 3)
    np.testing.assert_allclose(coords[3:5], [[1.5 + 2 * r2, 0], [1.5, 0]], atol=1e-12)
    # The lone node: at the centre of its box, half-width sqrt(1/3), after the pair's box and the gap.
    np.testing.assert_allclose(coords[5], [1.5 + 2 * r2 + 0.5 + math.sqrt(1 / 3), 0], atol=1e-12)
    assert len({tuple(c) for c in coords.round(9)}) == 6  # no two nodes share a position


def test_distances_to_adjacency_direct():
    dist = np.array([[0.0, 1.0, np.inf], [np.inf, 0.0, 2.0], [np.inf, np.inf, np.inf]])
    # finite {0, 1, 0, 2}: mean 0.75, std sqrt(0.6875)
    w1 = math.exp(-1 / 0.6875)
    np.testing.assert_allclose(distances_to_adjacency(dist), [[1, w1, 0], [0, 1, 0], [0, 0, 0]], rtol=1e-6, atol=0)
    with pytest.raises(DataError, match="all distances are equal"):
        distances_to_adjacency(np.zeros((2, 2)))
    with pytest.raises(DataError, match="NaN or negative"):
        distances_to_adjacency(np.array([[0.0, -1.0], [1.0, 0.0]]))
    with pytest.raises(ConfigError, match="normalized_k"):
        distances_to_adjacency(dist, normalized_k=1.5)


def test_haversine_of_known_points():
    d = haversine_km([0.0, 0.0, 90.0], [0.0, 1.0, 0.0])
    assert d.shape == (3, 3)
    assert d[0, 1] == pytest.approx(2 * math.pi * 6371.0 / 360, rel=1e-12)  # one degree of the equator
    assert d[0, 2] == pytest.approx(math.pi * 6371.0 / 2, rel=1e-12)  # equator to pole
    assert d[1, 2] == pytest.approx(math.pi * 6371.0 / 2, rel=1e-12)
    np.testing.assert_array_equal(np.diag(d), 0)
    np.testing.assert_array_equal(d, d.T)


def test_coordinates_kernel_by_hand():
    # Three points one degree apart on the equator: distances {0 x3, d x4, 2d x2}, std = d * sqrt(44) / 9,
    # so a one-degree neighbour weighs exp(-81/44) and a two-degree one exp(-324/44) < 0.1.
    adj = coordinates_to_adjacency([0.0, 0.0, 0.0], [0.0, 1.0, 2.0])
    w = math.exp(-81 / 44)
    np.testing.assert_allclose(adj, [[1, w, 0], [w, 1, w], [0, w, 1]], rtol=1e-6, atol=0)
    assert adj.dtype == np.float32
    with pytest.raises(DataError, match="NaN"):
        coordinates_to_adjacency([0.0, np.nan], [0.0, 1.0])


def test_coords_graph_from_the_bay_locations():
    ids = raw_pickle(BAY_PKL)[0]
    adj, got_ids = read_graph(BAY_LOCATIONS)  # the format is recognised from the csv's content
    assert got_ids == ids
    np.testing.assert_array_equal(adj, adj.T)
    np.testing.assert_array_equal(np.diag(adj), 1)
    subset, subset_ids = read_graph(BAY_LOCATIONS, fmt="coords", sensor_ids=ids[::-1][:10])
    assert subset_ids == ids[::-1][:10] and subset.shape == (10, 10)
    assert_data_error(lambda: read_graph(BAY_LOCATIONS, fmt="coords", sensor_ids=["999"]), BAY_LOCATIONS,
                      r"no coordinates for 1 of 1 sensors \(999\)")


def test_dense_matrices(tmp_path):
    matrix = np.array([[1.0, 0.5, 0.0], [0.25, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.save(tmp_path / "a.npy", matrix)
    adj, ids = read_graph(tmp_path / "a.npy")
    assert ids is None and adj.dtype == np.float32
    np.testing.assert_array_equal(adj, matrix)
    big = np.eye(5) * 0.5
    np.savetxt(tmp_path / "a.csv", big, delimiter=",")
    np.testing.assert_array_equal(read_graph(tmp_path / "a.csv")[0], big)  # 5 x 5 csv: dense
    assert_data_error(lambda: read_graph(tmp_path / "a.csv", sensor_ids=list("abcd")), tmp_path / "a.csv",
                      "5 nodes but the series has 4 sensors")
    np.savetxt(tmp_path / "m.csv", matrix, delimiter=",")
    np.testing.assert_array_equal(read_graph(tmp_path / "m.csv", fmt="dense")[0], matrix)


def test_bad_graphs(tmp_path):
    cases = {
        "rect.npy": (np.ones((2, 3)), "square matrix, got shape \\(2, 3\\)"),
        "nan.npy": (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or infinite"),
        "inf.npy": (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN or infinite"),
        "neg.npy": (np.array([[1.0, -0.5], [0.0, 1.0]]), "negative weight -0.5 at \\(0, 1\\)"),
    }
    for name, (matrix, pattern) in cases.items():
        np.save(tmp_path / name, matrix)
        assert_data_error(lambda: read_graph(tmp_path / name), tmp_path / name, pattern)
    assert_data_error(lambda: read_graph(tmp_path / "none.pkl"), tmp_path / "none.pkl", "no such file")
    (tmp_path / "g.graphml").write_text("<graph/>")
    assert_data_error(lambda: read_graph(tmp_path / "g.graphml"), tmp_path / "g.graphml", "unknown graph format")
    (tmp_path / "neg.csv").write_text("a,b,1\nb,a,-2\nc,a,3\nd,a,4\n")
    assert_data_error(lambda: read_graph(tmp_path / "neg.csv", fmt="edges"), tmp_path / "neg.csv",
                      "cost '-2' on the edge b -> a")
    (tmp_path / "text.csv").write_text("from,to,cost\na,b,1\nb,a,far\n")
    assert_data_error(lambda: read_graph(tmp_path / "text.csv"), tmp_path / "text.csv", "cost 'far'")
    (tmp_path / "same.csv").write_text("from,to,cost\na,b,1\nb,a,1\n")
    assert_data_error(lambda: read_graph(tmp_path / "same.csv"), tmp_path / "same.csv", "all distances are equal")


def test_pickles_that_are_not_graphs(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04not a pickle")
    assert_data_error(lambda: read_graph(tmp_path / "junk.pkl"), tmp_path / "junk.pkl", "cannot read .* graph pickle")
    with open(tmp_path / "dict.pkl", "wb") as f:
        pickle.dump({"adj": np.eye(2)}, f)
    assert_data_error(lambda: read_graph(tmp_path / "dict.pkl"), tmp_path / "dict.pkl", "expected DCRNN's pickle")

    class Sneaky:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(tmp_path / "code.pkl", "wb") as f:
        pickle.dump([["a"], {"a": 0}, Sneaky()], f)
    assert_data_error(lambda: read_graph(tmp_path / "code.pkl"), tmp_path / "code.pkl",
                      "refusing to load builtins.print")
    with open(tmp_path / "py3.pkl", "wb") as f:  # written by numpy 2 and Python 3: loads too
        pickle.dump([["a", "b"], {"a": 0, "b": 1}, np.eye(2, dtype=np.float32)], f)
    adj, ids = read_graph(tmp_path / "py3.pkl")
    assert ids == ["a", "b"]
    np.testing.assert_array_equal(adj, np.eye(2))


# ----------------------------------------------------------------------------- locations and alignment
def test_locations_in_both_layouts():
    la = read_locations(LA_LOCATIONS)
    assert list(la.columns) == ["sensor_id", "latitude", "longitude"] and len(la) == 207
    assert la.iloc[0].tolist() == ["773869", 34.15497, -118.31829]
    assert la["sensor_id"].tolist() == raw_pickle(LA_PKL)[0]
    bay = read_locations(BAY_LOCATIONS)
    assert len(bay) == 325 and bay.iloc[0].tolist() == ["400001", 37.364085, -121.901149]
    assert all(isinstance(s, str) for s in bay["sensor_id"])


def test_bad_locations(tmp_path):
    assert_data_error(lambda: read_locations(tmp_path / "none.csv"), tmp_path / "none.csv", "no such file")
    (tmp_path / "text.csv").write_text("sensor_id,latitude,longitude\n1,34.1,-118.2\n2,north,-118.3\n")
    assert_data_error(lambda: read_locations(tmp_path / "text.csv"), tmp_path / "text.csv",
                      "latitude 'north' of sensor 2")
    (tmp_path / "range.csv").write_text("1,34.1,-118.2\n2,34.2,-218.3\n")
    assert_data_error(lambda: read_locations(tmp_path / "range.csv"), tmp_path / "range.csv",
                      r"longitude '-218.3' of sensor 2; expected a number in \[-180, 180\]")
    (tmp_path / "dup.csv").write_text("1,34.1,-118.2\n1,34.2,-118.3\n")
    assert_data_error(lambda: read_locations(tmp_path / "dup.csv"), tmp_path / "dup.csv",
                      r"duplicated sensor ids \(1\)")
    (tmp_path / "cols.csv").write_text("id,x,y\n1,34.1,-118.2\n")
    assert_data_error(lambda: read_locations(tmp_path / "cols.csv"), tmp_path / "cols.csv", "no latitude column")


def tiny_series(ids) -> SeriesData:
    return SeriesData(np.zeros((2, len(ids))), pd.date_range("2020-01-01", periods=2, freq="5min"), list(ids), 5.0,
                      Path("series.h5"))


def test_align_reorders_the_graph_and_the_coordinates():
    adj = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.float32)  # rows/cols in order b, c, a
    locations = pd.DataFrame({"sensor_id": ["c", "a", "b", "zz"], "latitude": [3.0, 1.0, 2.0, 9.0],
                              "longitude": [30.0, 10.0, 20.0, 90.0]})
    ordered, coords = align(tiny_series("abc"), adj, ["b", "c", "a"], locations, files={})
    np.testing.assert_array_equal(ordered, [[9, 7, 8], [3, 1, 2], [6, 4, 5]])
    np.testing.assert_array_equal(coords, [[1, 10], [2, 20], [3, 30]])


def test_align_warns_about_sensors_without_coordinates():
    locations = pd.DataFrame({"sensor_id": ["a"], "latitude": [1.0], "longitude": [10.0]})
    with pytest.warns(UserWarning, match=r"loc.csv: no coordinates for 2 of 3 sensors of series.h5 \(b, c\)"):
        _, coords = align(tiny_series("abc"), np.eye(3), None, locations, files={"locations": "loc.csv"})
    np.testing.assert_array_equal(coords[0], [1, 10])
    assert np.isnan(coords[1:]).all()


def test_align_rejects_disagreeing_graphs():
    files = {"series": "city/speed.h5", "graph": "city/adj.pkl"}
    with pytest.raises(DataError) as info:
        align(tiny_series("abc"), np.eye(3), ["a", "b", "x"], None, files=files)
    message = str(info.value)
    assert "city/adj.pkl" in message and "city/speed.h5" in message
    assert "1 series sensors are not in the graph (c)" in message
    assert "1 graph sensors are not in the series (x)" in message
    with pytest.raises(DataError, match="city/adj.pkl has 4 nodes but city/speed.h5 has 3 sensors"):
        align(tiny_series("abc"), np.eye(4), None, None, files=files)


def test_align_real_sample_is_identity():
    series = read_series(WEEK_H5)
    adj, ids = read_graph(LA_PKL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every METR-LA sensor has coordinates
        ordered, coords = align(series, adj, ids, read_locations(LA_LOCATIONS), files={})
    np.testing.assert_array_equal(ordered, adj)
    assert coords.shape == (207, 2) and coords[0].tolist() == [34.15497, -118.31829]
