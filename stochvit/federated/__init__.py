"""Federated learning of stochvit models on Flower (optional extra: `pip install -e ".[federated]"`).

    partition.py   IID, Dirichlet(alpha) label-skew and label-shard client partitions, and their summary
    settings.py    the app's flat run config <-> TrainConfig
    task.py        what both apps share: the model, a node's data, local training (the trainer's epoch), evaluation
    client_app.py  ClientApp: the train / evaluate message handlers
    server_app.py  ServerApp: FedAvg(M) (flwr.serverapp.strategy), central evaluation, a checkpoint per round
                   (--resume), a normal run directory
    launch.py      SuperLink / SuperNode processes and `flwr run` for simulation and loopback deployment
    app/           the Flower app manifest (`flwr run "$(stochvit federated --print-app-path)" <connection>`)
"""
